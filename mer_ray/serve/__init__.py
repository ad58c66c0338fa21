"""The ensemble on Ray Serve: request schemas, HTTP ingress, members, deployments, sessions, the app builder."""
