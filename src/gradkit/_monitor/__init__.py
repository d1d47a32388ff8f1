"""Watching gradients during `fit`: the callback, its in-step recorder, history, writers, plots.

    _step_hook (gradkit._backends)  the interception inside the optimizer's step
    _step_state (gradkit._backends) the state it writes there, and the train function
    _ingraph     what runs inside the step (finite check; sums and counts on recorded updates)
    _ops         the ops it runs with, one namespace per backend
    _eager       the same sums and counts on torch's eager step, with few calls and buffers
    _recorder    the hooks and state variables of one monitor (a ring of recorded updates)
    _history     the statistics (host, float64, from those sums), records, the NumPy history
    _writers     JSON Lines, CSV, TensorBoard files
    _callback    GradientMonitor
    _plots       plot_gradient_flow, plot_histograms
"""
