"""The benchmark's scenarios, in the order they run (the floor first: it is the others'
denominator)."""
