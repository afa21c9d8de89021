"""The steps: index, validate, decode, summary.

They import only formats/ and store/; a step reads another's results through the report and the manifest.
"""
