"""The method's core, below every detector: config and presets, the frozen teacher and where its
weights come from, the two students, maps (pre-processing, discrepancies, upsample + blur), the
bounded token store, and device handling. It imports no other fbft layer but metrics and data."""
