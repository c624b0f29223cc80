"""Name mappings between our state dicts and other projects' formats."""
