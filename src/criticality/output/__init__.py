"""Tables, figures and the report of an analysis; reads saved tables, never evaluates a model.

    tables.py               the one reader/writer of RUN/analysis: cells.csv, distances.csv, summary.json
    text.py                 one number format, metric labels, the terminal's verdict table
    canvas.py               what every figure shares: Agg figure, colour map, literal labels, save (PNG + SVG)
    heatmaps.py             robustness and distance heatmaps (the paper's layout)
    intervention_figures.py error vs α, error vs σ, skip bars, μ bars, proxy scatter
    figures.py              draw_run: the one composer, listing every figure function; width bars
    report.py               the self-contained report.html
"""
