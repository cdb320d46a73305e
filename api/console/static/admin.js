// Storage (admins) and access: hosts, accounts, projects and API keys, as the API shows them.
import { html, useState } from "./vendor/preact-htm.js";
import * as api from "./api.js";
import { Badge, ErrorBox, FormDialog, Modal, age, filled, formatBytes, formatDate, short, useAct, useLoad } from "./ui.js";

const STORAGE_FIELDS = {
  ImageStore: [["url", "URL (file:///path)", true], ["role", "role"], ["encryptionPassphrase", "encryption passphrase (optional)", false, "password"]],
  Remote: [["url", "URL of the storage-server (http(s)://host:port/repo)", true], ["token", "token", true, "password"], ["caFile", "CA file (optional)"], ["encryptionPassphrase", "encryption passphrase (optional)", false, "password"]],
  PublicCloud: [["url", "URL (s3://bucket/prefix)", true], ["endpoint", "endpoint (empty: AWS)"], ["region", "region"], ["accessKey", "access key"], ["secretKey", "secret key", false, "password"], ["encryptionPassphrase", "encryption passphrase", true, "password"]],
};

function AddStorageDialog({ onClose, onDone }) {
  const [type, setType] = useState("ImageStore");
  return html`<${FormDialog} title="Add backup storage" submitLabel="Add" onClose=${onClose}
    onSubmit=${async (values) => {
      await api.create("backup-storage", filled({ ...values, type }));
      onDone();
    }}>
    <label>Type <select value=${type} onChange=${(e) => setType(e.target.value)}>
      <option value="ImageStore">ImageStore (a local disk or a mounted share)</option>
      <option value="Remote">Remote (a blockvault storage-server)</option>
      <option value="PublicCloud">PublicCloud (S3)</option></select></label>
    <label>Name <input name="name" required /></label>
    ${STORAGE_FIELDS[type].map(([name, label, required, inputType]) =>
      name === "role"
        ? html`<label>Role <select name="role"><option value="master">master</option><option value="standby">standby</option></select></label>`
        : html`<label>${label} <input name=${name} type=${inputType || "text"} required=${Boolean(required)} autocomplete="off" /></label>`,
    )}
  <//>`;
}

export function StoragePage({ ctx }) {
  const [adding, setAdding] = useState(false);
  const { data, error, reload } = useLoad(() => api.rows("backup-storage", [], { sort: "+createDate" }), []);
  const { act, failure, message, setMessage } = useAct(reload);
  const job = (storage, what, name) =>
    act(async () => ctx.follow(`${what}: ${storage.name}`, await api.action(`/v1/backup-storage/${storage.uuid}`, name), (result) => {
      if (result) setMessage(`${what} of ${storage.name}: ${JSON.stringify(result)}`);
      reload();
    }));
  return html`<h1>Backup storage</h1>
    ${message ? html`<p class="notice" role="status">${message}</p>` : null}
    <${ErrorBox} error=${failure || error} />
    <div class="actions"><button type="button" class="primary" onClick=${() => setAdding(true)}>Add backup storage</button></div>
    ${data ? html`<div class="table-wrap"><table class="responsive" id="storages"><thead><tr><th>Storage</th><th>Type</th><th>Role</th><th>Status</th><th>Capacity</th><th>URL</th><th>Actions</th></tr></thead><tbody>
      ${data.map((s) => html`<tr data-storage=${s.uuid}>
        <td data-label="Storage">${s.name}</td><td data-label="Type">${s.type}</td><td data-label="Role">${s.type === "ImageStore" ? s.role : "–"}</td>
        <td data-label="Status"><${Badge} value=${s.status} /> <${Badge} value=${s.state} /></td>
        <td data-label="Capacity">${formatBytes(s.availableCapacity)} free of ${formatBytes(s.totalCapacity)}</td>
        <td data-label="URL" class="mono">${s.url}</td>
        <td data-label="Actions"><div class="actions">
          <button type="button" onClick=${() => act(() => api.action(`/v1/backup-storage/${s.uuid}`, "reconnectBackupStorage"))}>Reconnect</button>
          ${s.type === "ImageStore" && s.role === "standby"
            ? html`<button type="button" onClick=${() => act(() => api.action(`/v1/backup-storage/${s.uuid}`, "switchBackupStorageRole"))}>Make master</button>`
            : null}
          <button type="button" onClick=${() => job(s, "Reclaim space", "reclaimSpaceFromImageStore")}>Reclaim space</button>
          <button type="button" onClick=${() => job(s, "Scan", "scanBackupStorage")}>Scan</button>
          <button type="button" onClick=${() => act(() => api.action(`/v1/backup-storage/${s.uuid}`, "changeBackupStorageState", { stateEvent: s.state === "Enabled" ? "disable" : "enable" }))}>${s.state === "Enabled" ? "Disable" : "Enable"}</button>
        </div></td></tr>`)}
      </tbody></table></div>` : null}
    ${adding ? html`<${AddStorageDialog} onClose=${() => setAdding(false)} onDone=${reload} />` : null}`;
}

export function AccessPage({ ctx }) {
  const { me } = ctx;
  const [dialog, setDialog] = useState(null);
  const [shownKey, setShownKey] = useState(null);
  const { data, error, reload } = useLoad(async () => {
    const [hosts, accounts, projects, keys] = await Promise.all([
      me.admin ? api.rows("hosts", [], { sort: "+name" }) : [],
      api.rows("accounts", [], { sort: "+name" }),
      api.rows("projects", [], { sort: "+name" }),
      api.rows("api-keys"),
    ]);
    return { hosts, accounts, projects, keys };
  }, []);
  const { act, failure } = useAct(reload);
  if (!data) return html`<h1>Access</h1><${ErrorBox} error=${error} />`;
  const accountName = Object.fromEntries(data.accounts.map((a) => [a.uuid, a.name]));
  return html`<h1>Access</h1>
    <${ErrorBox} error=${failure || error} />
    ${me.admin ? html`<section class="panel"><h2>Hosts</h2>
      <table class="responsive" id="host-list"><thead><tr><th>Host</th><th>Address</th><th>Status</th><th>Last heartbeat</th><th>Volume roots</th></tr></thead><tbody>
        ${data.hosts.map((h) => html`<tr><td data-label="Host">${h.name || short(h.uuid)}</td><td data-label="Address">${h.managementIp || h.hostname || "–"}</td>
          <td data-label="Status"><${Badge} value=${h.status} /></td><td data-label="Last heartbeat">${h.lastHeartbeat ? `${age(h.lastHeartbeat)} ago` : "never"}</td>
          <td data-label="Volume roots" class="mono">${(h.volumeRoots || []).join(", ")}</td></tr>`)}
      </tbody></table></section>` : null}
    <section class="panel"><h2>Accounts</h2>
      ${me.admin ? html`<div class="actions"><button type="button" class="primary" onClick=${() => setDialog("account")}>New account</button></div>` : null}
      <table class="responsive" id="accounts"><thead><tr><th>Account</th><th>Type</th><th>Created</th></tr></thead><tbody>
        ${data.accounts.map((a) => html`<tr><td data-label="Account">${a.name}</td><td data-label="Type">${a.type}</td><td data-label="Created">${formatDate(a.createDate)}</td></tr>`)}
      </tbody></table></section>
    <section class="panel"><h2>Projects</h2>
      <div class="actions">
        ${me.admin ? html`<button type="button" class="primary" onClick=${() => setDialog("project")}>New project</button>` : null}
        ${data.projects.length ? html`<button type="button" onClick=${() => setDialog("member")}>Add a member</button>` : null}
      </div>
      <table class="responsive" id="projects"><thead><tr><th>Project</th><th>Description</th><th>uuid</th></tr></thead><tbody>
        ${data.projects.map((p) => html`<tr><td data-label="Project">${p.name}</td><td data-label="Description">${p.description || ""}</td><td data-label="uuid" class="mono">${p.uuid}</td></tr>`)}
      </tbody></table></section>
    <section class="panel"><h2>API keys</h2>
      <div class="actions"><button type="button" class="primary" onClick=${() => setDialog("key")}>New API key</button></div>
      <table class="responsive" id="keys"><thead><tr><th>Name</th><th>Account</th><th>Created</th><th>Last used</th><th></th></tr></thead><tbody>
        ${data.keys.map((k) => html`<tr><td data-label="Name">${k.name || short(k.uuid)}</td><td data-label="Account">${accountName[k.accountUuid] || short(k.accountUuid)}</td>
          <td data-label="Created">${formatDate(k.createDate)}</td><td data-label="Last used">${k.lastUsedDate ? formatDate(k.lastUsedDate) : "never"}</td>
          <td><button type="button" class="danger" onClick=${() => act(() => api.remove(`/v1/api-keys/${k.uuid}`))}>Revoke</button></td></tr>`)}
      </tbody></table></section>
    ${dialog === "account" ? html`<${FormDialog} title="New account" submitLabel="Create" onClose=${() => setDialog(null)}
        onSubmit=${async (v) => { await api.create("accounts", filled(v)); reload(); }}>
        <label>Name <input name="name" required /></label>
        <label>Type <select name="type"><option value="Normal">Normal</option><option value="SystemAdmin">SystemAdmin</option></select></label>
        <label>Password (optional: for signing in here) <input name="password" type="password" autocomplete="new-password" /></label>
      <//>` : null}
    ${dialog === "project" ? html`<${FormDialog} title="New project" submitLabel="Create" onClose=${() => setDialog(null)}
        onSubmit=${async (v) => { await api.create("projects", filled(v)); reload(); }}>
        <label>Name <input name="name" required /></label>
        <label>Description <input name="description" /></label>
      <//>` : null}
    ${dialog === "member" ? html`<${FormDialog} title="Add a member to a project" submitLabel="Add" onClose=${() => setDialog(null)}
        onSubmit=${async (v) => { await api.call("POST", `/v1/projects/${v.project}/members`, { body: { params: { accountUuid: v.accountUuid, role: v.role } } }); reload(); }}>
        <label>Project <select name="project">${data.projects.map((p) => html`<option value=${p.uuid}>${p.name}</option>`)}</select></label>
        <label>Account <select name="accountUuid">${data.accounts.map((a) => html`<option value=${a.uuid}>${a.name}</option>`)}</select></label>
        <label>Role <select name="role"><option value="member">member</option><option value="projectAdmin">projectAdmin</option></select></label>
      <//>` : null}
    ${dialog === "key" ? html`<${FormDialog} title="New API key" submitLabel="Create" onClose=${() => setDialog(null)}
        onSubmit=${async (v) => { setShownKey((await api.create("api-keys", filled(v))).inventory); reload(); }}>
        <label>Name <input name="name" /></label>
        ${me.admin ? html`<label>Account <select name="accountUuid"><option value="">mine</option>${data.accounts.map((a) => html`<option value=${a.uuid}>${a.name}</option>`)}</select></label>` : null}
      <//>` : null}
    ${shownKey ? html`<${Modal} title="The new API key" onClose=${() => setShownKey(null)}>
        <p>Copy it now: it is shown this once and never again.</p>
        <p class="secret" id="new-key">${shownKey.key}</p>
        <div class="actions"><button type="button" class="primary" onClick=${() => setShownKey(null)}>I have copied it</button></div>
      <//>` : null}`;
}
