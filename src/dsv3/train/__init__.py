"""Training: data, the trainer (aux-loss-free balancing, MTP loss), evaluation, plots, routing simulator."""
