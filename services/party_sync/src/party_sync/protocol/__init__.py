"""The wire contract: message types, the envelope codec, error codes and the JSON Schemas."""
