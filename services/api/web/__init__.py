"""Server-rendered web pages for people: list, new comparison, comparison, arena."""
