"""Generated protobuf/gRPC stubs (python -m kvpilot.protogen). Do not edit."""
