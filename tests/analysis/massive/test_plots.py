"""analysis.massive.plots: deep models show evenly spaced heatmap layers."""


def test_deep_models_show_evenly_spaced_heatmap_layers():
  from analysis.massive import plots as P
  assert P.shown_layers(4) == [0, 1, 2, 3]
  shown = P.shown_layers(30)
  assert len(shown) == P.MAX_HEATMAP_LAYERS and shown[0] == 0 and shown[-1] == 29 and shown == sorted(set(shown))
