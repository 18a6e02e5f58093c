"""Request and response bodies of the admin API, as the OpenAPI document shows them.

Names, roles and patterns are plain strings here: `moorage.admin` validates
them, so its messages (with the value and the fix) reach the caller unchanged.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from moorage.db.identity_store import (
    AccountRecord,
    CustomerRecord,
    GrantRecord,
    PersonalTokenRecord,
)


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(
            "time is out of range in UTC; use a year from 1 to 9999"
        ) from None


# A time in a request body, which needs a zone and is converted to UTC as stored.
UTCDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


def check_text(value: str) -> str:
    """Return `value` unless it contains a control character or a lone
    surrogate; raise ValueError naming the first one.

    PostgreSQL cannot store NUL or a lone surrogate, and no name needs any of
    them, so both databases reject the same input.
    """
    for character in value:
        if unicodedata.category(character) in ("Cc", "Cs"):
            raise ValueError(
                f"contains U+{ord(character):04X}, a control character or lone "
                "surrogate; remove it"
            )
    return value


# Text in a request body: every string field, because each is stored or looked up.
Text = Annotated[str, AfterValidator(check_text)]


class Body(BaseModel):
    """A request body: unknown fields are rejected, so a typo is not ignored."""

    model_config = ConfigDict(extra="forbid")


class NewUser(Body):
    login: Text = Field(examples=["alice"])
    role: Text = Field(
        "reader", description="reader, writer, maintainer or owner", examples=["writer"]
    )


class RoleChange(Body):
    role: Text = Field(
        description="reader, writer, maintainer or owner", examples=["reader"]
    )


class NewRobot(Body):
    name: Text = Field(description="Its login is CUSTOMER+NAME.", examples=["ci"])
    role: Text = Field("reader", description="reader, writer, maintainer or owner")
    expires_at: UTCDatetime | None = Field(
        None, description="When the secret stops working (ISO 8601 with a zone)."
    )


class RobotRotation(Body):
    expires_at: UTCDatetime | None = Field(
        None, description="New expiry; the old one stays when this is missing."
    )


class NewGrant(Body):
    pattern: Text = Field(examples=["acme/app", "acme/*"])
    role: Text = Field(description="reader, writer, maintainer or owner")
    until: UTCDatetime | None = Field(None, description="Last moment of access.")
    account: Text | None = Field(
        None, description="Grant to this login only, not the whole customer."
    )


class NewPersonalToken(Body):
    name: Text = Field("token", min_length=1, max_length=100, examples=["laptop"])
    role: Text = Field(
        "reader",
        description="The maximum role the token acts with, never above the "
        "user's: reader, writer or maintainer.",
    )
    expires_at: UTCDatetime | None = Field(
        None, description="Expiry; 90 days from now when missing."
    )
    repositories: list[Text] | None = Field(
        None,
        description="Repository patterns (such as acme/app or acme/ci-*) the token "
        "is limited to; every repository the user may reach when missing.",
        examples=[["acme/app"]],
    )


class Customer(BaseModel):
    slug: str
    display_name: str
    status: str = Field(description="active or suspended")
    access_until: datetime | None = Field(
        description="When the contract ends and every login of it stops working."
    )
    created_at: datetime
    namespaces: list[str]

    @classmethod
    def of(cls, record: CustomerRecord, namespaces: list[str]) -> Customer:
        return cls(
            slug=record.slug,
            display_name=record.display_name,
            status=record.status,
            access_until=record.access_until,
            created_at=record.created_at,
            namespaces=namespaces,
        )


class Account(BaseModel):
    login: str
    kind: str = Field(description="user or robot")
    role: str | None
    customer: str | None = Field(description="None for the vendor's accounts.")
    disabled: bool
    expires_at: datetime | None

    @classmethod
    def of(cls, record: AccountRecord) -> Account:
        return cls(
            login=record.login,
            kind=record.kind,
            role=record.role,
            customer=record.customer_slug,
            disabled=record.disabled,
            expires_at=record.expires_at,
        )


class CreatedUser(Account):
    password: str = Field(description="Generated; shown only in this response.")


class CreatedRobot(Account):
    secret: str = Field(description="Generated; shown only in this response.")


class NewPassword(BaseModel):
    login: str
    password: str = Field(description="Generated; shown only in this response.")


class NewSecret(BaseModel):
    login: str
    secret: str = Field(description="Generated; shown only in this response.")
    expires_at: datetime | None


class Grant(BaseModel):
    id: int
    pattern: str
    role: str
    until: datetime | None
    account: str | None = Field(description="None: a grant to the whole customer.")

    @classmethod
    def of(cls, record: GrantRecord, logins: dict[int, str]) -> Grant:
        account = None if record.account_id is None else logins.get(record.account_id)
        return cls(
            id=record.id,
            pattern=record.pattern,
            role=record.role,
            until=record.until,
            account=account,
        )


class PersonalToken(BaseModel):
    id: int
    name: str
    role: str
    repositories: list[str] | None = Field(
        description="The patterns the token is limited to; None for no limit."
    )
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, record: PersonalTokenRecord) -> PersonalToken:
        return cls(
            id=record.id,
            name=record.name,
            role=record.role,
            repositories=(
                None if record.repositories is None else list(record.repositories)
            ),
            expires_at=record.expires_at,
            revoked_at=record.revoked_at,
            created_at=record.created_at,
        )


class CreatedPersonalToken(PersonalToken):
    token: str = Field(description="Shown only in this response.")


class Me(BaseModel):
    login: str
    kind: str
    customer: str | None
    role: str | None
    personal_token_id: int | None = Field(
        description="Set when this request used a personal access token."
    )
    token_role: str | None = Field(description="That token's cap on the role.")
    management_role: str | None = Field(
        description="admin (all customers), auditor (read all), owner (own "
        "customer) or None."
    )


class RepositoryTags(BaseModel):
    name: str
    tags: list[str] = Field(description="The first tags in lexical order.")
    more_tags: bool = Field(description="True when the repository has more tags.")


class RepositoryPage(BaseModel):
    repositories: list[RepositoryTags]
    next: str | None = Field(
        description="Pass as `last` for the next page; None on the last page."
    )
