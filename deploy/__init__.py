"""Deployment helpers: TLS and node credentials, site data folders, a loopback federation."""
