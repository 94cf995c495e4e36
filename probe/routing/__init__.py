"""The routing plane: routing tables, balancers, node health, retry budgets."""
