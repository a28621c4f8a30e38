"""The fleet: agents found, scored and given work (devices, discovery, dispatch, sessions)."""
