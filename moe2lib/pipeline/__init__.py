"""The pipeline: stages run as papermill notebooks, their artifacts' keys, the report and the command line."""
