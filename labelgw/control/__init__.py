"""Control of the running gateway: active health checks, passive ejection, the admin view and explain."""
