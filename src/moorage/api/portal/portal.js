// The customer portal's script. It keeps the login and password in memory
// only and sends them as HTTP Basic with every request to the admin API, so
// reloading the page logs out. Text from the server is written with
// textContent only, never parsed as HTML.
"use strict";

const registry = document
  .querySelector('meta[name="moorage-registry"]')
  .getAttribute("content");
const registryHost = registry.replace(/^https?:\/\//, "");
const DAY_MS = 24 * 60 * 60 * 1000;

let credentials = null;
let me = null;
let nextRepositories = null;
let selected = null;

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function byId(id) {
  return document.getElementById(id);
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function showMessage(text, isError) {
  const message = byId("message");
  message.textContent = text;
  message.className = isError ? "error" : "";
  message.hidden = false;
}

function basicAuthorization(login, password) {
  // btoa takes Latin-1 only, so encode the UTF-8 bytes one character each.
  const bytes = new TextEncoder().encode(`${login}:${password}`);
  let binary = "";
  for (const byte of bytes) {
    binary += String.fromCharCode(byte);
  }
  return `Basic ${btoa(binary)}`;
}

// Send one request with the logged-in credentials; return the JSON body, or
// null for an empty one. Raise ApiError with the server's messages on failure.
async function call(method, path, body) {
  const headers = {
    Authorization: basicAuthorization(credentials.login, credentials.password),
  };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  // credentials "omit" also keeps the browser from showing its own login
  // dialog on a 401 with a Basic challenge.
  const response = await fetch(path, init);
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch (error) {
    parsed = null;
  }
  if (!response.ok) {
    const errors = parsed && Array.isArray(parsed.errors) ? parsed.errors : [];
    const message = errors.map((entry) => entry.message).join("; ");
    throw new ApiError(response.status, message || `HTTP status ${response.status}`);
  }
  return parsed;
}

function apiPath(...parts) {
  return "/api/v1/" + parts.map(encodeURIComponent).join("/");
}

// Instructions

function setLines(id, lines) {
  byId(id).textContent = lines.join("\n");
}

function showInstructions() {
  const login = me.login;
  const repository = selected ? selected.repository : "REPOSITORY";
  const tag = selected ? selected.tag : "TAG";
  const image = `${registryHost}/${repository}:${tag}`;
  const archive = `${repository.split("/").pop()}-${tag}.tar`;

  byId("registry-host").textContent = registryHost;
  byId("selected-image").textContent = image;
  byId("plain-http").hidden = !registry.startsWith("http://");

  setLines("docker-commands", [
    `docker login ${registryHost} --username ${login}`,
    `docker pull ${image}`,
  ]);
  setLines("podman-commands", [
    `podman login ${registryHost} --username ${login}`,
    `podman pull ${image}`,
  ]);
  setLines("skopeo-commands", [
    `skopeo login ${registryHost} --username ${login}`,
    `skopeo copy docker://${image} oci-archive:${archive}`,
  ]);
  setLines("kubernetes-commands", [
    "kubectl create secret docker-registry registry-pull \\",
    `  --docker-server=${registryHost} \\`,
    `  --docker-username=${robotExample()} \\`,
    "  --docker-password=SECRET",
    "# then in the pod spec:",
    "#   imagePullSecrets:",
    "#     - name: registry-pull",
    `#   image: ${image}`,
  ]);
  setLines("helm-commands", [
    `helm registry login ${registryHost} --username ${login}`,
    `helm pull oci://${registryHost}/${repository} --version ${tag}`,
  ]);
}

function robotExample() {
  if (me.kind === "robot") {
    return me.login;
  }
  return me.customer ? `${me.customer}+ROBOT` : me.login;
}

function select(repository, tag) {
  selected = { repository, tag };
  for (const button of document.querySelectorAll("button.tag")) {
    const chosen = button.dataset.repository === repository && button.dataset.tag === tag;
    button.setAttribute("aria-pressed", chosen ? "true" : "false");
  }
  showInstructions();
}

// Repositories

async function loadRepositories(last) {
  const query = last ? `?last=${encodeURIComponent(last)}` : "";
  const page = await call("GET", `/api/v1/me/repositories${query}`);
  const body = byId("repositories").querySelector("tbody");
  for (const repository of page.repositories) {
    const row = document.createElement("tr");
    cell(row, repository.name);
    const tags = cell(row, "");
    for (const tag of repository.tags) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "tag";
      button.textContent = tag;
      button.dataset.repository = repository.name;
      button.dataset.tag = tag;
      button.addEventListener("click", () => select(repository.name, tag));
      tags.appendChild(button);
    }
    if (repository.more_tags) {
      tags.appendChild(document.createTextNode(" and more tags"));
    }
    body.appendChild(row);
    if (selected === null && repository.tags.length > 0) {
      select(repository.name, repository.tags[0]);
    }
  }
  nextRepositories = page.next;
  byId("more-repositories").hidden = nextRepositories === null;
  byId("no-repositories").hidden = body.rows.length > 0;
}

// Robots (owners only)

function robotName(login) {
  return login.slice(me.customer.length + 1);
}

async function loadRobots() {
  const robots = await call("GET", apiPath("customers", me.customer, "robots"));
  const body = byId("robots").querySelector("tbody");
  body.replaceChildren();
  for (const robot of robots) {
    const row = document.createElement("tr");
    row.dataset.login = robot.login;
    cell(row, robot.login);
    cell(row, robot.role || "");
    cell(row, robot.disabled ? "disabled" : "active");
    cell(row, robot.expires_at || "never");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "rotate";
    button.textContent = "Rotate secret";
    button.addEventListener("click", () => rotateRobot(robot.login, button));
    cell(row, "").appendChild(button);
    body.appendChild(row);
  }
}

async function rotateRobot(login, button) {
  // The first click turns the button into a confirmation, the second rotates.
  if (button.dataset.confirming !== "true") {
    button.dataset.confirming = "true";
    button.textContent = "Confirm: rotate now";
    return;
  }
  button.dataset.confirming = "false";
  button.textContent = "Rotate secret";
  const path = apiPath("customers", me.customer, "robots", robotName(login), "secret");
  try {
    const rotated = await call("POST", path, {});
    byId("new-secret-login").textContent = rotated.login;
    byId("new-secret-value").textContent = rotated.secret;
    byId("new-secret").hidden = false;
    showMessage(`Rotated the secret of ${rotated.login}.`, false);
  } catch (error) {
    showMessage(`Rotating the secret of ${login} failed: ${error.message}`, true);
  }
}

// Personal access tokens (users only)

async function loadTokens() {
  const tokens = await call("GET", "/api/v1/me/tokens");
  const body = byId("tokens").querySelector("tbody");
  body.replaceChildren();
  for (const token of tokens) {
    const row = document.createElement("tr");
    row.dataset.tokenId = String(token.id);
    cell(row, token.name);
    cell(row, token.role);
    cell(row, token.repositories ? token.repositories.join(", ") : "all");
    cell(row, token.expires_at || "never");
    cell(row, token.revoked_at ? "revoked" : "active");
    const actions = cell(row, "");
    if (!token.revoked_at) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "revoke";
      button.textContent = "Revoke";
      button.addEventListener("click", () => revokeToken(token));
      actions.appendChild(button);
    }
    body.appendChild(row);
  }
}

async function revokeToken(token) {
  try {
    await call("DELETE", apiPath("me", "tokens", String(token.id)));
    showMessage(`Revoked the token ${token.name}.`, false);
    await loadTokens();
  } catch (error) {
    showMessage(`Revoking the token failed: ${error.message}`, true);
  }
}

async function createToken(event) {
  event.preventDefault();
  const days = Number(byId("token-days").value);
  const body = {
    name: byId("token-name").value,
    role: byId("token-role").value,
    expires_at: new Date(Date.now() + days * DAY_MS).toISOString(),
  };
  try {
    const created = await call("POST", "/api/v1/me/tokens", body);
    byId("new-token-value").textContent = created.token;
    byId("new-token").hidden = false;
    showMessage(`Created the token ${created.name}.`, false);
    await loadTokens();
  } catch (error) {
    showMessage(`Creating the token failed: ${error.message}`, true);
  }
}

// Password (users only)

async function changePassword(event) {
  event.preventDefault();
  const password = byId("new-password").value;
  if (password !== byId("repeat-password").value) {
    showMessage("The two new passwords differ: type the same one twice.", true);
    return;
  }
  try {
    await call("PUT", "/account/password", { password });
    credentials = { login: credentials.login, password };
    byId("password-form").reset();
    showMessage("Changed your password. Log in with the new one from now on.", false);
  } catch (error) {
    showMessage(`Changing the password failed: ${error.message}`, true);
  }
}

// Login and logout

async function logIn(event) {
  event.preventDefault();
  credentials = { login: byId("login").value, password: byId("password").value };
  try {
    me = await call("GET", "/api/v1/me");
  } catch (error) {
    credentials = null;
    showMessage(`Login failed: ${error.message}`, true);
    return;
  }

  byId("login-form").reset();
  byId("message").hidden = true;
  const customer = me.customer ? `, customer ${me.customer}` : "";
  byId("who").textContent = `${me.login} (${me.role || "no role"}${customer})`;
  byId("session").hidden = false;
  byId("login-section").hidden = true;
  byId("account").hidden = false;

  const owner = me.management_role === "owner" && me.customer !== null;
  byId("robots-section").hidden = !owner;
  byId("tokens-section").hidden = me.kind !== "user";
  byId("password-section").hidden = me.kind !== "user" || me.personal_token_id !== null;
  showInstructions();

  try {
    await loadRepositories(null);
    if (owner) {
      await loadRobots();
    }
    if (me.kind === "user") {
      await loadTokens();
    }
  } catch (error) {
    showMessage(`Loading failed: ${error.message}`, true);
  }
}

function logOut() {
  // Reloading drops every credential and every secret shown.
  credentials = null;
  window.location.reload();
}

byId("login-form").addEventListener("submit", logIn);
byId("logout").addEventListener("click", logOut);
byId("token-form").addEventListener("submit", createToken);
byId("password-form").addEventListener("submit", changePassword);
byId("more-repositories").addEventListener("click", () =>
  loadRepositories(nextRepositories).catch((error) =>
    showMessage(`Loading failed: ${error.message}`, true),
  ),
);
