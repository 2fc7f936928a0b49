"""Live market data over HTTP (DESIGN §3.1, issue 20): a lender, a volatility index and an event calendar,
each enabled by its URL; with none set nothing here runs and rates come from the files only.

- `validation`: every provider answer checked before use (`BadAnswer`);
- `calls`: one provider's calls (deadline, jittered retries, circuit breaker, lanes, metrics, logs);
- `lender`, `volatility`, `events`: each provider's request and answer;
- `book`: the lender's answers in process, what the rate computation reads (no await);
- `election`: the one refresher per deployment (a PostgreSQL advisory lock);
- `refresher`: `LiveSources`, the refresher, cold fetches, the book in step on every replica, health.

`assembly.build_live_sources` puts them together from the settings (None when no provider is set).
"""
