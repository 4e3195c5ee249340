"""enrich: enrich dataframes through Parallel's Task API."""
