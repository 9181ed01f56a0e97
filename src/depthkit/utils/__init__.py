"""Small helpers shared by every subpackage: atomic output folders, JSON results, tables."""
