"""Alembic environment: runs on the connection that `moorage.db.engine` passes in."""

from alembic import context

from moorage.db.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through `moorage db upgrade` or moorage.db.engine.migrate"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
