"""Results: the store (`store`), leaderboard tables (`leaderboard`, `html_report`) and figures (`plots`)."""
