"""The wire contracts: `proto/` compiled to Python stubs in `_generated/` (`make protos`).

The lowest layer but one: the server (`quicknet.serve`) and the client SDK (`quicknet.client`) both
import these stubs, and neither imports the other.
"""
