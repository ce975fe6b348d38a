"""The Python side of publishing an edit: model cards, unguide.json for UnGuidePipeline, the export job."""
