"""The warehouse: schema migrations, batch loading and rollup refresh (DESIGN §6)."""
