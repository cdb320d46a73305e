// The blockvault web console: sign-in, navigation, API jobs in progress; pages in their modules.
import { html, render, useEffect, useState, useCallback } from "./vendor/preact-htm.js";
import * as api from "./api.js";
import { ErrorBox, Progress } from "./ui.js";
import { OverviewPage } from "./overview.js";
import { VmPage, VolumePage } from "./resources.js";
import { SchedulingPage } from "./scheduling.js";
import { StoragePage, AccessPage } from "./admin.js";

const DONE_SHOWN_MS = 6000; // a finished job's panel goes away by itself; a failed one stays

function parseRoute() {
  const parts = (window.location.hash.replace(/^#\/?/, "") || "overview").split("/");
  return { page: parts[0], id: parts[1] || null };
}

/** Who is signed in: {name, admin, accountUuid, kind, token}. */
async function identify(token, kind, accountUuid) {
  const admins = await api.call("GET", "/v1/accounts", { token, query: { q: "type=SystemAdmin", count: "true" } });
  const admin = admins.data.total > 0;
  if (accountUuid) {
    const account = (await api.call("GET", `/v1/accounts/${accountUuid}`, { token })).data.inventories[0];
    return { token, kind, admin, accountUuid, name: account.name };
  }
  if (admin) return { token, kind, admin, accountUuid: null, name: "admin (API key)" };
  const own = (await api.call("GET", "/v1/accounts", { token })).data.inventories[0];
  return { token, kind, admin, accountUuid: own ? own.uuid : null, name: own ? own.name : "API key" };
}

function SignIn({ onSignedIn, notice }) {
  const [tab, setTab] = useState("password");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    const form = Object.fromEntries(new FormData(event.target).entries());
    try {
      if (tab === "password") {
        const digest = await api.sha512hex(form.password);
        const answer = await api.call("PUT", "/v1/accounts/login", {
          anonymous: true,
          body: { logInByAccount: { accountName: form.accountName, password: digest } },
        });
        const session = answer.data.inventory;
        onSignedIn(await identify(session.uuid, "session", session.accountUuid));
      } else {
        onSignedIn(await identify(form.apiKey.trim(), "key", null));
      }
    } catch (failure) {
      setError(failure);
    } finally {
      setBusy(false);
    }
  };
  return html`<main class="signin" id="main">
    <h1>Sign in to blockvault</h1>
    ${notice ? html`<p class="notice" role="status">${notice}</p>` : null}
    <div class="tabs" role="tablist" aria-label="How to sign in">
      <button role="tab" aria-selected=${tab === "password"} onClick=${() => setTab("password")}>Account and password</button>
      <button role="tab" aria-selected=${tab === "key"} onClick=${() => setTab("key")}>API key</button>
    </div>
    <form class="stack" onSubmit=${submit} aria-label="Sign in">
      ${tab === "password"
        ? html`<label>Account name <input name="accountName" autocomplete="username" required /></label>
            <label>Password <input name="password" type="password" autocomplete="current-password" required /></label>`
        : html`<label>API key <input name="apiKey" type="password" autocomplete="off" required /></label>`}
      <${ErrorBox} error=${error} />
      <div class="actions"><button class="primary" type="submit" disabled=${busy}>Sign in</button></div>
    </form>
  </main>`;
}

const PAGES = [
  ["overview", "Overview", false],
  ["scheduling", "Scheduling", false],
  ["storage", "Storage", true],
  ["access", "Access", false],
];

function Shell({ me, route, onSignOut, children }) {
  return html`<a class="skip" href="#main">Skip to the page</a>
    <header class="top">
      <a class="brand" href="#/overview">blockvault</a>
      <nav aria-label="Pages">
        <ul>
          ${PAGES.filter(([, , adminOnly]) => me.admin || !adminOnly).map(
            ([id, label]) =>
              html`<li><a href="#/${id}" aria-current=${route.page === id ? "page" : undefined}>${label}</a></li>`,
          )}
        </ul>
      </nav>
      <div class="who">
        <span>Signed in as <strong>${me.name}</strong>${me.admin ? " (admin)" : ""}</span>
        <button type="button" onClick=${onSignOut}>Sign out</button>
      </div>
    </header>
    <main id="main" tabindex="-1">${children}</main>`;
}

/** API jobs started from the console, polled at GET /v1/api-jobs/{uuid} until they end. */
function Jobs({ jobs, dismiss }) {
  if (!jobs.length) return null;
  return html`<section class="jobs" aria-label="API jobs" aria-live="polite">
    ${jobs.map(
      (job) => html`<div class="job" data-job=${job.uuid} data-state=${job.state}>
        <div><strong>${job.label}</strong></div>
        ${job.state === "Running"
          ? html`<${Progress} value=${job.progress} label=${`${job.label} progress`} />`
          : job.state === "Succeeded"
            ? html`<span class="badge ok">Ready</span> done`
            : html`<span class="badge bad">Failed</span> <span class="error-text">${job.error}</span>`}
        ${job.state !== "Running"
          ? html` <button type="button" onClick=${() => dismiss(job.uuid)} aria-label="Dismiss ${job.label}">Dismiss</button>`
          : null}
      </div>`,
    )}
  </section>`;
}

function App() {
  const [me, setMe] = useState(api.currentAuth());
  const [notice, setNotice] = useState(null);
  const [route, setRoute] = useState(parseRoute());
  const [features, setFeatures] = useState({});
  const [jobs, setJobs] = useState([]);

  useEffect(() => {
    const changed = () => setRoute(parseRoute());
    window.addEventListener("hashchange", changed);
    api.onUnauthorized((error) => {
      api.saveAuth(null);
      setMe(null);
      setNotice(error.message);
    });
    // optional routes that light up once the API has them (OpenAPI: no key needed)
    api
      .call("GET", "/openapi.json", { anonymous: true })
      .then(({ data }) => {
        const text = JSON.stringify(data);
        setFeatures({
          fileBrowser: Boolean(data.paths && data.paths["/v1/volume-backups/{uuid}/files"]),
          instantRestore: text.includes("instantRestoreVolumeFromVolumeBackup"),
          instantRestoreVm: text.includes("instantRestoreVmFromVmBackup"),
        });
      })
      .catch(() => setFeatures({}));
    return () => window.removeEventListener("hashchange", changed);
  }, []);

  const update = (uuid, change) => setJobs((list) => list.map((j) => (j.uuid === uuid ? { ...j, ...change } : j)));
  /** Follow the API job an answer names; onDone(result) once it succeeded. */
  const follow = useCallback((label, answer, onDone) => {
    if (!answer || !answer.jobUuid) {
      if (onDone) onDone(answer && answer.inventory);
      return;
    }
    const uuid = answer.jobUuid;
    setJobs((list) => [...list, { uuid, label, state: "Running", progress: 0 }]);
    const poll = async () => {
      try {
        const state = await api.jobState(uuid);
        if (!state.done) {
          update(uuid, { progress: state.progress });
          setTimeout(poll, 700);
          return;
        }
        update(uuid, { state: "Succeeded", progress: 100 });
        setTimeout(() => setJobs((list) => list.filter((j) => j.uuid !== uuid)), DONE_SHOWN_MS);
        if (onDone) onDone(state.result);
      } catch (error) {
        update(uuid, { state: "Failed", error: `${error.code}: ${error.message}` });
        if (onDone) onDone(null, error);
      }
    };
    poll();
  }, []);

  const signOut = async () => {
    const auth = api.currentAuth();
    if (auth && auth.kind === "session") {
      try {
        await api.call("DELETE", `/v1/accounts/sessions/${auth.token}`, { anonymous: true });
      } catch {
        // an expired session is gone already
      }
    }
    api.saveAuth(null);
    setMe(null);
    setNotice("Signed out.");
  };

  if (!me) {
    return html`<${SignIn}
      notice=${notice}
      onSignedIn=${(who) => {
        api.saveAuth(who);
        setNotice(null);
        setMe(who);
      }}
    />`;
  }
  const ctx = { me, features, follow };
  let page;
  if (route.page === "vm" && route.id) page = html`<${VmPage} key=${route.id} id=${route.id} ctx=${ctx} />`;
  else if (route.page === "volume" && route.id) page = html`<${VolumePage} key=${route.id} id=${route.id} ctx=${ctx} />`;
  else if (route.page === "scheduling") page = html`<${SchedulingPage} ctx=${ctx} />`;
  else if (route.page === "storage" && me.admin) page = html`<${StoragePage} ctx=${ctx} />`;
  else if (route.page === "access") page = html`<${AccessPage} ctx=${ctx} />`;
  else page = html`<${OverviewPage} ctx=${ctx} />`;
  return html`<${Shell} me=${me} route=${route} onSignOut=${signOut}>${page}<//>
    <${Jobs} jobs=${jobs} dismiss=${(uuid) => setJobs((list) => list.filter((j) => j.uuid !== uuid))} />`;
}

const root = document.getElementById("app");
root.textContent = ""; // the "Loading" line
render(html`<${App} />`, root);
