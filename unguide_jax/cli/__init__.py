"""Command-line jobs (unguide-train, unguide-sample, unguide-export) and their typed configs."""
