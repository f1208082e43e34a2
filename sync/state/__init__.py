"""The state database: its tables, engines and migrations, and every state change as a named
verb (leases, audiences, memberships, runs) plus read-only inspection."""
