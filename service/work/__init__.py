"""What runs work: the runner and its agents, webhook deliveries, and outbound address checks."""
