"""The neutral contract between kvpilot's services: generated gRPC stubs (v1), frames and plans, policy
descriptions and statistic specs, the wire codec, telemetry names, transport security and the gRPC server
helpers. decoder_service and policy_service import this package and never each other or the app (kvpilot)."""
