"""Pure domain types shared by every role: ids, the task state machine, events, models."""
