"""Every key in an InferenceService that KServe's (or Kubernetes') API types do not have, walked
with the kserve SDK's own generated models: the offline stand-in for the CRD schema an API server
would apply. Run in a subprocess (`python -m tests.kserve_fields < manifest.yaml`, prints a JSON
list): importing kserve registers its `inference.*` protos in protobuf's default pool, which
clashes with tritonclient's in the test process (tests/test_kserve.py does the same for its client)."""

from __future__ import annotations

import json
import sys

import yaml


def unknown_fields(value: object, type_name: str, path: str = "") -> list[str]:
    import kserve.models
    import kubernetes.client.models

    if type_name.startswith(("list[", "List[")):
        return [e for i, item in enumerate(value) for e in unknown_fields(item, type_name[5:-1], f"{path}[{i}]")]
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name, None)
    if cls is None:  # a scalar, a map of scalars, or a type the SDK leaves opaque (V1Time, Knative's)
        return []
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({type_name})"]
    by_key = {key: name for name, key in cls.attribute_map.items()}
    errors = [f"{path}.{key}: not a field of {type_name}" for key in value if key not in by_key]
    for key, item in value.items():
        if key in by_key:
            errors += unknown_fields(item, cls.openapi_types[by_key[key]], f"{path}.{key}")
    return errors


if __name__ == "__main__":
    print(json.dumps(unknown_fields(yaml.safe_load(sys.stdin), "V1beta1InferenceService")))
