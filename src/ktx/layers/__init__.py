"""Building blocks shared by the model definitions (torch reference implementations)."""
