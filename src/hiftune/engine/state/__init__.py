"""The paged state: where inactive groups' optimizer state and fp32 masters live, and checking it on load."""
