"""Generated protobuf/gRPC code for protos/oracle.proto (do not edit by hand)."""
