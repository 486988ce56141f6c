"""Protocol plumbing shared by the fronts: `http` (errors, deadlines, disconnects, call metrics,
the app) and `grpc` (status mapping, deadlines, call metrics, health, the server). A front
declares its routes or servicers and its protocol tag; these modules do the rest."""
