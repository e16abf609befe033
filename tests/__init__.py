"""hapair's tests: ``support/`` holds what they share (servers, sites, labs), ``chaos/``
the randomized fault run."""
