"""How a real deployment starts: certificates, local stack, compose files, units."""
