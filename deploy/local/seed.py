"""Seed tenant databases for the local demo: customers and orders as a SaaS app would have
them before the example migrations (names in one field, totals and dates as strings)."""
import random
import sys

from pymongo import MongoClient

uri, *tenants = sys.argv[1:]
client = MongoClient(uri)
first = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Niklaus"]
last = ["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Hamilton", "Wirth"]
for t, tenant in enumerate(tenants):
    rnd = random.Random(t)
    db = client[tenant]
    db.drop_collection("customers")
    db.drop_collection("orders")
    n = 2000 + 500 * t
    db.customers.insert_many(
        {"_id": i, "name": f"{rnd.choice(first)} {rnd.choice(last)}", "email": f"c{i}@{tenant}.example.com"}
        for i in range(n)
    )
    db.orders.insert_many(
        {
            "_id": i,
            "customerId": rnd.randrange(n),
            "total": f"{rnd.randrange(100, 50000) / 100:.2f}",
            "placedAt": f"2024-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d}T12:00:00Z",
            "status": rnd.choice(["open", "shipped", "cancelled"]),
        }
        for i in range(3 * n)
    )
    print(f"seeded {tenant}: {n} customers, {3 * n} orders")
