"""Test kit for party_sync: real WebSocket clients, a scriptable engine, servers on loopback."""
