"""Online learning: the durable feedback queue, the updater and its evaluation gate."""
