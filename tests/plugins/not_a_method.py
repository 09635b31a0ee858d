"""A module registered as a method that is not one: it has no Options and no apply."""
