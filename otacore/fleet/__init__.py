"""The fleet in memory: reported versions, jobs and their moves, batches and their states, rollouts and who is eligible."""
