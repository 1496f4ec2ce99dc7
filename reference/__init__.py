"""Tools that compare exvae with the authors' code (see reference/README.md)."""
