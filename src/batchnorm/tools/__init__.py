"""From training to deployment: fold, recalibrate, freeze, convert, diagnose, distribute."""
