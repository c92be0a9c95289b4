"""CFP: ground-to-BEV projection and translation to satellite style."""
