// Scheduling: job groups and their targets, triggers with their next fire times, the job history.
import { html, useState } from "./vendor/preact-htm.js";
import * as api from "./api.js";
import {
  Badge,
  ErrorBox,
  FormDialog,
  Modal,
  dateToTriggerTime,
  filled,
  formatDate,
  formatDuration,
  short,
  triggerTimeToDate,
  useAct,
  useLoad,
} from "./ui.js";

function FireTimes({ trigger }) {
  const { data, error } = useLoad(() => api.get(`/v1/scheduler/triggers/${trigger.uuid}/fire-times`, { count: 5 }), [trigger.uuid, trigger.lastOpDate]);
  if (error) return html`<${ErrorBox} error=${error} />`;
  if (!data) return html`<span class="muted">…</span>`;
  if (!data.fireTimes.length) return html`<span class="muted">no more fires</span>`;
  return html`<ol class="fire-times">${data.fireTimes.map((t) => html`<li>${formatDate(t)}</li>`)}</ol>`;
}

function describe(trigger) {
  const when = trigger.schedulerType === "cron"
    ? `cron "${trigger.cron}" (${trigger.timeZone || "UTC"})`
    : `every ${formatDuration(trigger.schedulerInterval)}${trigger.repeatCount ? `, ${trigger.repeatCount} times` : ""}`;
  const start = triggerTimeToDate(trigger.startTime);
  const stop = triggerTimeToDate(trigger.stopTime);
  return `${when}${start ? `, from ${formatDate(start)}` : ""}${stop ? `, until ${formatDate(stop)}` : ""}`;
}

function GroupDialog({ data, onClose, onDone }) {
  const [type, setType] = useState("vmBackup");
  const targets = type === "vmBackup" ? data.vms : data.volumes;
  return html`<${FormDialog} title="New job group" submitLabel="Create" onClose=${onClose}
    onSubmit=${async (values, form) => {
      const storages = [...form.querySelectorAll("input[name=storage]:checked")].map((i) => i.value);
      const chosen = [...form.querySelectorAll("input[name=target]:checked")].map((i) => i.value);
      const parameters = filled({
        backupStorageUuids: storages.length ? storages : "",
        fullBackupInterval: values.fullBackupInterval ? Number(values.fullBackupInterval) : "",
        retention: values.keepLast ? { keepLast: Number(values.keepLast) } : "",
      });
      const group = (await api.create("scheduler/jobgroups", { name: values.name, type, parameters })).inventory;
      if (chosen.length) await api.call("POST", `/v1/scheduler/jobgroups/${group.uuid}/jobs`, { body: { params: { targetResourceUuids: chosen } } });
      onDone();
    }}>
    <label>Name <input name="name" required /></label>
    <label>Type <select name="type" value=${type} onChange=${(e) => setType(e.target.value)}>
      <option value="vmBackup">VM backup</option><option value="volumeBackup">volume backup</option></select></label>
    <fieldset><legend>Backup storage (the first takes the backup, the others get a copy)</legend>
      ${data.storages.map((s) => html`<label class="check"><input type="checkbox" name="storage" value=${s.uuid} /> ${s.name} (${s.type}${s.type === "ImageStore" ? `, ${s.role}` : ""})</label>`)}
    </fieldset>
    <label>Full backup every N runs (0: only the first) <input name="fullBackupInterval" type="number" min="0" /></label>
    <label>Keep the last N backups <input name="keepLast" type="number" min="1" /></label>
    <fieldset><legend>Targets</legend>
      ${targets.length === 0 ? html`<p class="muted">Nothing to back up yet.</p>` : null}
      ${targets.map((t) => html`<label class="check"><input type="checkbox" name="target" value=${t.uuid} /> ${t.name}</label>`)}
    </fieldset>
  <//>`;
}

function TriggerDialog({ groups, onClose, onDone }) {
  const [type, setType] = useState("simple");
  return html`<${FormDialog} title="New trigger" submitLabel="Create" onClose=${onClose}
    onSubmit=${async (v) => {
      const params = filled({
        name: v.name,
        schedulerType: type,
        schedulerInterval: type === "simple" && v.schedulerInterval ? Number(v.schedulerInterval) : "",
        repeatCount: v.repeatCount ? Number(v.repeatCount) : "",
        cron: type === "cron" ? v.cron : "",
        timeZone: type === "cron" ? v.timeZone : "",
        startTime: v.startTime ? dateToTriggerTime(new Date(v.startTime)) : "",
      });
      const trigger = (await api.create("scheduler/triggers", params)).inventory;
      if (v.group) await api.call("POST", `/v1/scheduler/triggers/${trigger.uuid}/jobgroups/${v.group}`, { body: { params: {} } });
      onDone();
    }}>
    <label>Name <input name="name" required /></label>
    <label>Type <select name="schedulerType" value=${type} onChange=${(e) => setType(e.target.value)}>
      <option value="simple">simple (every N seconds)</option><option value="cron">cron</option></select></label>
    ${type === "simple"
      ? html`<label>Interval (seconds) <input name="schedulerInterval" type="number" min="1" required /></label>`
      : html`<label>Cron expression (five fields, or Quartz's six or seven) <input name="cron" placeholder="0 2 * * *" required /></label>
          <label>Time zone <input name="timeZone" placeholder="UTC" /></label>`}
    <label>Repeat count (empty: forever) <input name="repeatCount" type="number" min="1" /></label>
    <label>Start (your local time; empty: now) <input name="startTime" type="datetime-local" /></label>
    <label>Attach to job group <select name="group"><option value="">none</option>${groups.map((g) => html`<option value=${g.uuid}>${g.name}</option>`)}</select></label>
  <//>`;
}

function History({ groups, names }) {
  const [filters, setFilters] = useState({ group: "", target: "", success: "", from: "", to: "" });
  const [row, setRow] = useState(null);
  const conditions = [];
  if (filters.group) conditions.push(`schedulerJobGroupUuid=${filters.group}`);
  if (filters.target) conditions.push(`targetResourceUuid=${filters.target}`);
  if (filters.success) conditions.push(`success=${filters.success}`);
  if (filters.from) conditions.push(`executeTime>=${new Date(filters.from).toISOString()}`);
  if (filters.to) conditions.push(`executeTime<=${new Date(filters.to).toISOString()}`);
  const key = JSON.stringify(conditions);
  const { data, error } = useLoad(() => api.query("scheduler/jobhistories", conditions, { sort: "-executeTime", limit: 50, replyWithCount: "true" }), [key], 5000);
  const set = (name) => (e) => setFilters({ ...filters, [name]: e.target.value });
  const pretty = (text) => {
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch {
      return text || "";
    }
  };
  return html`<section class="panel" aria-labelledby="history-title"><h2 id="history-title">Job history</h2>
    <form class="inline" aria-label="Filter the job history" onSubmit=${(e) => e.preventDefault()}>
      <label>Group <select name="group" value=${filters.group} onChange=${set("group")}><option value="">all</option>${groups.map((g) => html`<option value=${g.uuid}>${g.name}</option>`)}</select></label>
      <label>Target <select name="target" value=${filters.target} onChange=${set("target")}><option value="">all</option>${Object.entries(names).map(([uuid, name]) => html`<option value=${uuid}>${name}</option>`)}</select></label>
      <label>Result <select name="success" value=${filters.success} onChange=${set("success")}><option value="">all</option><option value="true">succeeded</option><option value="false">failed</option></select></label>
      <label>From <input type="datetime-local" name="from" value=${filters.from} onChange=${set("from")} /></label>
      <label>To <input type="datetime-local" name="to" value=${filters.to} onChange=${set("to")} /></label>
    </form>
    <${ErrorBox} error=${error} />
    ${data ? html`<p class="muted">${data.total} runs${data.total > 50 ? ", the newest 50 shown" : ""}</p>
      <div class="table-wrap"><table class="responsive" id="history"><thead><tr><th>#</th><th>Fire time</th><th>Group</th><th>Target</th><th>Result</th><th></th></tr></thead><tbody>
      ${data.inventories.map((h) => html`<tr data-history=${h.id} class=${row && row.id === h.id ? "selected" : ""}>
        <td data-label="#">${h.id}</td><td data-label="Fire time">${formatDate(h.executeTime)}</td>
        <td data-label="Group">${(groups.find((g) => g.uuid === h.schedulerJobGroupUuid) || {}).name || short(h.schedulerJobGroupUuid)}</td>
        <td data-label="Target">${names[h.targetResourceUuid] || short(h.targetResourceUuid)}</td>
        <td data-label="Result"><${Badge} value=${h.success ? "Succeeded" : "Failed"} /></td>
        <td><button type="button" onClick=${() => setRow(h)}>Details</button></td></tr>`)}
      </tbody></table></div>` : null}
    ${row ? html`<${Modal} title="Run #${row.id}" onClose=${() => setRow(null)}>
        <h3>Request</h3><pre class="dump" id="request-dump">${pretty(row.requestDump)}</pre>
        <h3>Result</h3><pre class="dump" id="result-dump">${pretty(row.resultDump)}</pre>
        <div class="actions"><button type="button" onClick=${() => setRow(null)}>Close</button></div>
      <//>` : null}
  </section>`;
}

export function SchedulingPage({ ctx }) {
  const [dialog, setDialog] = useState(null);
  const { data, error, reload } = useLoad(async () => {
    const [groups, jobs, triggers, vms, volumes, storages] = await Promise.all([
      api.rows("scheduler/jobgroups", [], { sort: "+name" }),
      api.rows("scheduler/jobs"),
      api.rows("scheduler/triggers", [], { sort: "+name" }),
      api.rows("vm-instances", [], { sort: "+name" }),
      api.rows("volumes", [], { sort: "+name" }),
      api.rows("backup-storage"),
    ]);
    return { groups, jobs, triggers, vms, volumes, storages };
  }, []);
  const { act, failure, message } = useAct(reload);
  if (!data) return html`<h1>Scheduling</h1><${ErrorBox} error=${error} />`;
  const names = Object.fromEntries([...data.vms, ...data.volumes].map((r) => [r.uuid, r.name]));
  const groupAction = (g, name, params = {}) => api.action(`/v1/scheduler/jobgroups/${g.uuid}`, name, params);
  return html`<h1>Scheduling</h1>
    ${message ? html`<p class="notice" role="status">${message}</p>` : null}
    <${ErrorBox} error=${failure || error} />
    <section class="panel" aria-labelledby="groups-title"><h2 id="groups-title">Job groups</h2>
      <div class="actions"><button type="button" class="primary" onClick=${() => setDialog("group")}>New job group</button></div>
      <div class="table-wrap"><table class="responsive" id="groups"><thead><tr><th>Group</th><th>Type</th><th>State</th><th>Targets</th><th>Triggers</th><th>Actions</th></tr></thead><tbody>
        ${data.groups.map((g) => {
          const jobs = data.jobs.filter((j) => j.schedulerJobGroupUuid === g.uuid);
          const triggers = data.triggers.filter((t) => (g.triggersUuid || []).includes(t.uuid));
          return html`<tr data-group=${g.uuid}><td data-label="Group">${g.name}</td><td data-label="Type">${g.jobType}</td>
            <td data-label="State"><${Badge} value=${g.state} /></td>
            <td data-label="Targets">${jobs.map((j) => html`<div>${names[j.targetResourceUuid] || short(j.targetResourceUuid)}</div>`)}</td>
            <td data-label="Triggers">${triggers.map((t) => html`<div>${t.name}</div>`)}</td>
            <td data-label="Actions"><div class="actions">
              <button type="button" onClick=${() => act(async () => `${(await groupAction(g, "runSchedulerJobGroup")).inventory.jobsStarted} jobs started for ${g.name}`)}>Run now</button>
              <button type="button" onClick=${() => act(() => groupAction(g, "changeSchedulerJobGroupState", { stateEvent: g.state === "Enabled" ? "disable" : "enable" }))}>${g.state === "Enabled" ? "Disable" : "Enable"}</button>
              <button type="button" class="danger" onClick=${() => setDialog({ deleteGroup: g })}>Delete</button>
            </div></td></tr>`;
        })}
      </tbody></table></div>
    </section>
    <section class="panel" aria-labelledby="triggers-title"><h2 id="triggers-title">Triggers</h2>
      <div class="actions"><button type="button" class="primary" onClick=${() => setDialog("trigger")}>New trigger</button></div>
      <div class="table-wrap"><table class="responsive" id="triggers"><thead><tr><th>Trigger</th><th>Schedule</th><th>State</th><th>Groups</th><th>Next five fires</th><th>Actions</th></tr></thead><tbody>
        ${data.triggers.map((t) => html`<tr data-trigger=${t.uuid}><td data-label="Trigger">${t.name}</td><td data-label="Schedule">${describe(t)}</td>
          <td data-label="State"><${Badge} value=${t.state} /></td>
          <td data-label="Groups">${data.groups.filter((g) => (g.triggersUuid || []).includes(t.uuid)).map((g) => html`<div>${g.name}</div>`)}</td>
          <td data-label="Next five fires"><${FireTimes} trigger=${t} /></td>
          <td data-label="Actions"><div class="actions">
            <button type="button" onClick=${() => act(() => api.action(`/v1/scheduler/triggers/${t.uuid}`, "updateSchedulerTrigger", { state: t.state === "Enabled" ? "Disabled" : "Enabled" }))}>${t.state === "Enabled" ? "Disable" : "Enable"}</button>
            <button type="button" class="danger" onClick=${() => act(() => api.remove(`/v1/scheduler/triggers/${t.uuid}`))}>Delete</button>
          </div></td></tr>`)}
      </tbody></table></div>
    </section>
    <${History} groups=${data.groups} names=${names} />
    ${dialog === "group" ? html`<${GroupDialog} data=${data} onClose=${() => setDialog(null)} onDone=${reload} />` : null}
    ${dialog === "trigger" ? html`<${TriggerDialog} groups=${data.groups} onClose=${() => setDialog(null)} onDone=${reload} />` : null}
    ${dialog && dialog.deleteGroup ? html`<${FormDialog} title="Delete job group ${dialog.deleteGroup.name}" submitLabel="Delete" danger onClose=${() => setDialog(null)}
        onSubmit=${async () => {
          await api.remove(`/v1/scheduler/jobgroups/${dialog.deleteGroup.uuid}`);
          reload();
        }}><p>Deletes the job group <strong>${dialog.deleteGroup.name}</strong> and its ${data.jobs.filter((j) => j.schedulerJobGroupUuid === dialog.deleteGroup.uuid).length} jobs. Its backups and its history stay.</p><//>` : null}`;
}
