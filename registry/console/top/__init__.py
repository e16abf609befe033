"""``hapair top``: a live site dashboard for a terminal, fed by a registry's event stream.

- :mod:`hapair.registry.console.top.state`: what is known besides the site report (the connection,
  the operator's selection, the question asked);
- :mod:`hapair.registry.console.top.view`: the screen as a pure function of what is known
  (site report, connection state, clock, selection);
- :mod:`hapair.registry.console.top.control`: keys to selections, confirmations and admin requests,
  also pure, and the :class:`~registry.console.top.control.Top` controller that holds the state;
- :mod:`hapair.registry.console.top.feed`: the site from the first registry that answers, switching
  to another when it goes away, and the admin requests;
- :mod:`hapair.registry.console.top.terminal`: the terminal itself (raw keys, full-screen frames).
"""
