"""The zembed broker: frontend ROUTER for clients, backend ROUTER for engines, one poll loop."""
