import Mustache

/// The admin's pages as Mustache templates, compiled into the binary (no
/// file to lose, nothing fetched at page load). `{{x}}` escapes HTML;
/// `{{{x}}}` is used only for SVG the server rendered and escaped itself.
enum Templates {
    static func library() throws -> MustacheLibrary {
        var library = MustacheLibrary()
        for (name, text) in all + partials { try library.register(text, named: name) }
        return library
    }

    static let all: [(String, String)] = [
        ("head", head), ("foot", foot), ("flash", flash),
        ("overview", overview), ("policy", policy), ("job", job), ("dead", dead), ("login", login), ("error", error),
    ]

    static let head = """
        <!doctype html>
        <html lang="en" data-theme="auto">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>{{title}} · dispatch-policy</title>
        <link rel="icon" href="data:,">
        <link rel="stylesheet" href="/assets/admin.css">
        <script src="/assets/admin.js" defer></script>
        </head>
        <body>
        <header>
          <a class="brand" href="/">dispatch-policy</a>
          <nav><a href="/">Policies</a> <a href="/dead">Dead jobs</a> <a href="/metrics">Metrics</a></nav>
          <form class="jump" action="/jobs" method="get"><input name="id" inputmode="numeric" placeholder="Job id" aria-label="Job id"></form>
          <label>Refresh <select id="refresh" aria-label="Auto-refresh"><option value="0">off</option><option value="2">2 s</option><option value="5">5 s</option><option value="10">10 s</option></select></label>
          <label>Theme <select id="theme" aria-label="Theme"><option value="auto">auto</option><option value="light">light</option><option value="dark">dark</option></select></label>
          {{#session.signedIn}}<form method="post" action="/logout"><input type="hidden" name="csrf" value="{{session.csrf}}"><button>Sign out</button></form>{{/session.signedIn}}
          {{#session.canSignIn}}<a href="/login">Sign in</a>{{/session.canSignIn}}
        </header>
        <main>
        {{> flash}}
        """

    static let foot = """
        </main>
        <footer>rendered {{renderedAt}} UTC in {{renderMs}} ms</footer>
        </body>
        </html>
        """

    static let flash = """
        {{#flash}}<p class="flash" role="status">{{flash}}</p>{{/flash}}{{#flashError}}<p class="flash error" role="alert">{{flashError}}</p>{{/flashError}}
        """

    static let overview = """
        {{> head}}
        <h1>Policies</h1>
        {{^policies}}<p class="empty">No policies declared yet. Declare one with <code>dispatch-policy policy apply FILE</code>.</p>{{/policies}}
        {{^empty(policies)}}
        <table class="grid">
        <thead><tr><th>Policy</th><th>State</th><th class="n">Pending</th><th class="n">Scheduled</th><th class="n">In flight</th><th class="n">Admitted 24 h</th><th class="n">Completed 24 h</th><th class="n">Failed 24 h</th><th class="n">Failure %</th><th class="n">Dead</th><th class="n" title="Jobs finished as expired (deadline) and as dropped (backlog cap), and deferrals by workers, in 24 hours">Expired / dropped / deferred 24 h</th><th class="n">Throughput</th><th class="n">Lag P50 / P95</th><th class="n">Oldest pending</th><th>Headroom</th><th>Pending, last hour</th><th>Done and lag, last hour</th></tr></thead>
        <tbody>
        {{#policies}}
        <tr>
          <td><a href="/policies/{{urlName}}">{{name}}</a></td>
          <td><span class="state {{state}}">{{state}}</span></td>
          <td class="n">{{pending}}</td><td class="n">{{scheduled}}</td><td class="n">{{inFlight}}</td>
          <td class="n">{{admitted24h}}</td><td class="n">{{completed24h}}</td><td class="n">{{failed24h}}</td><td class="n">{{failurePercent}}</td>
          <td class="n">{{#dead}}<a href="/dead?policy={{urlName}}">{{dead}}</a>{{/dead}}{{^dead}}0{{/dead}}</td>
          <td class="n">{{expired24h}} / {{dropped24h}} / {{deferred24h}}</td>
          <td class="n">{{throughput}}/min</td><td class="n">{{lagP50}} / {{lagP95}}</td><td class="n">{{oldest}}</td>
          <td>{{headroom}}</td><td>{{{pendingTrend}}}</td><td>{{{trend}}}</td>
        </tr>
        {{^empty(hints)}}<tr class="hints"><td></td><td colspan="16"><ul>{{#hints}}<li>{{.}}</li>{{/hints}}</ul></td></tr>{{/empty(hints)}}
        {{/policies}}
        </tbody>
        </table>
        {{/empty(policies)}}
        {{> foot}}
        """

    static let policy = """
        {{> head}}
        <h1>{{name}} <span class="state {{state}}">{{state}}</span></h1>
        {{#shadowMode}}<p class="note">Shadow mode: every job the fetch reaches is admitted; the gates only record what they would have refused (the Would refuse column; <code>partition_overview.would_refuse</code>). Redeclare without <code>"mode": "shadow"</code> to enforce them.</p>{{/shadowMode}}
        {{^empty(hints)}}<ul class="hints">{{#hints}}<li>{{.}}</li>{{/hints}}</ul>{{/empty(hints)}}
        {{#actions}}
        <div class="actions">
          <form method="post" action="/actions/{{pauseAction}}"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="policy" value="{{name}}"><button>{{pauseLabel}} policy</button></form>
          <form method="post" action="/actions/drain" class="confirm" data-confirm="Cancel every staged job of {{name}}?"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="policy" value="{{name}}"><button class="danger">Drain policy</button></form>
        </div>
        {{/actions}}
        <section>
        <h2>Last hour</h2>
        <p class="legend"><span class="swatch done"></span> completed per minute <span class="swatch failed"></span> failed <span class="swatch lag"></span> average queue lag (admitted → started)</p>
        {{{chart}}}
        </section>
        <section>
        <h2>Watched partitions</h2>
        {{#empty(watched)}}<p class="empty">None. Press ☆ on a partition to keep it here (stored in this browser and in the page's address).</p>{{/empty(watched)}}
        {{^empty(watched)}}<table class="grid partitions">{{> partitionHead}}<tbody>{{#watched}}{{> partitionRow}}{{/watched}}</tbody></table>{{/empty(watched)}}
        </section>
        <section>
        <h2>Partitions</h2>
        <form class="filters" method="get" action="/policies/{{urlName}}">
          <input type="search" name="q" value="{{query}}" placeholder="Search partitions" aria-label="Search partitions">
          <label><input type="checkbox" name="pending" value="1" {{#onlyPending}}checked{{/onlyPending}}> only with jobs waiting</label>
          <label><input type="checkbox" name="busy" value="1" {{#onlyBusy}}checked{{/onlyBusy}}> only busy</label>
          <label>Sort <select name="sort"><option value="partition" {{#sortPartition}}selected{{/sortPartition}}>partition</option><option value="in_flight" {{#sortInFlight}}selected{{/sortInFlight}}>in flight</option></select></label>
          {{#watchParams}}<input type="hidden" name="watch" value="{{.}}">{{/watchParams}}
          <button>Apply</button>
        </form>
        {{#empty(partitions)}}<p class="empty">No partitions yet: a partition appears once a job is staged into it or admitted or refused through a throttle, concurrency or adaptive gate.</p>{{/empty(partitions)}}
        {{^empty(partitions)}}<table class="grid partitions">{{> partitionHead}}<tbody>{{#partitions}}{{> partitionRow}}{{/partitions}}</tbody></table>{{/empty(partitions)}}
        {{#next}}<p class="pager"><a href="{{next}}">Next page →</a></p>{{/next}}
        </section>
        <section>
        <h2>Lanes with jobs waiting</h2>
        <p class="note">The round-robin fetch rotates over these. A blocked lane takes no batch slot until its gate lets it through.</p>
        {{#empty(lanes)}}<p class="empty">No jobs waiting.</p>{{/empty(lanes)}}
        {{^empty(lanes)}}
        <table class="grid"><thead><tr><th>Lane</th><th class="n">Pending</th><th>Blocked</th></tr></thead><tbody>
        {{#lanes}}<tr><td>{{lane}}</td><td class="n">{{pending}}</td><td>{{blocked}}</td></tr>{{/lanes}}
        </tbody></table>
        {{#lanesNext}}<p class="pager"><a href="{{lanesNext}}">More lanes →</a></p>{{/lanesNext}}
        {{/empty(lanes)}}
        </section>
        <section>
        <h2>Gates</h2>
        <table class="grid"><thead><tr><th>Gate</th><th>Type</th><th>Partition by</th></tr></thead><tbody>
        {{#gates}}<tr><td>{{name}}</td><td>{{type}}</td><td><code>{{partitionBy}}</code></td></tr>{{/gates}}
        </tbody></table>
        <details><summary>Policy JSON</summary><pre>{{config}}</pre></details>
        </section>
        {{> foot}}
        """

    static let partitionHead = """
        <thead><tr><th></th><th>Gate</th><th>Partition</th><th class="n">Pending</th><th class="n">In flight</th><th class="n">Cap</th><th class="n">Tokens</th><th class="n">EWMA lag</th>{{#shadow}}<th class="n" title="Shadow mode: jobs this partition would have refused, admitted anyway">Would refuse</th>{{/shadow}}<th>Last staged</th><th>Last admitted</th><th>Last hour</th>{{#actions}}<th>Actions</th>{{/actions}}</tr></thead>
        """

    static let partitionRow = """
        <tr class="{{#paused}}paused{{/paused}}">
          <td><button class="watch" type="button" data-partition="{{partition}}" aria-label="Watch {{partition}}">☆</button></td>
          <td>{{gate}} <small>{{gateType}}</small></td><td class="key">{{partition}}{{#paused}} <span class="state paused">paused</span>{{/paused}}</td>
          <td class="n">{{pending}}</td><td class="n">{{inFlight}}</td><td class="n">{{cap}}</td><td class="n">{{tokens}}</td><td class="n">{{ewma}}</td>{{#shadow}}<td class="n">{{wouldRefuse}}{{#wouldBeLag}} <small>{{wouldBeLag}}</small>{{/wouldBeLag}}</td>{{/shadow}}<td>{{lastStaged}}</td><td>{{lastAdmitted}}</td><td>{{{spark}}}</td>
          {{#actions}}<td class="row-actions">
            <form method="post" action="/actions/{{pauseAction}}-partition"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="policy" value="{{policy}}"><input type="hidden" name="gate" value="{{gate}}"><input type="hidden" name="partition" value="{{partition}}"><button>{{pauseLabel}}</button></form>
            <form method="post" action="/actions/admit-now" class="admit-now"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="policy" value="{{policy}}"><input type="hidden" name="gate" value="{{gate}}"><input type="hidden" name="partition" value="{{partition}}"><input type="number" name="max" value="1" min="1" max="100000" aria-label="How many to admit now"><button title="Admit up to this many pending jobs of the partition now, through its gates">Admit now</button></form>
            <form method="post" action="/actions/drain" class="confirm" data-confirm="Cancel the staged jobs of this partition?"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="policy" value="{{policy}}"><input type="hidden" name="gate" value="{{gate}}"><input type="hidden" name="partition" value="{{partition}}"><button class="danger">Drain</button></form>
          </td>{{/actions}}
        </tr>
        """

    static let job = """
        {{> head}}
        <h1>Job {{id}} <span class="state {{state}}">{{state}}</span></h1>
        <dl class="facts">
          <dt>Policy</dt><dd><a href="/policies/{{urlPolicy}}">{{policy}}</a></dd>
          <dt>Queue</dt><dd>{{queue}}</dd><dt>Attempt</dt><dd>{{attempt}}</dd>
          {{#dedupeKey}}<dt>Dedupe key</dt><dd class="key">{{dedupeKey}}</dd>{{/dedupeKey}}
          {{#roundRobinKey}}<dt>Lane</dt><dd class="key">{{roundRobinKey}}</dd>{{/roundRobinKey}}
        </dl>
        {{#actions}}
        <div class="actions">
          {{#canCancel}}<form method="post" action="/actions/cancel" class="confirm" data-confirm="Cancel job {{id}}?"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="id" value="{{id}}"><button class="danger">Cancel job</button></form>{{/canCancel}}
          {{#canRetry}}<form method="post" action="/actions/retry"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="id" value="{{id}}"><button>Retry job</button></form>{{/canRetry}}
        </div>
        {{/actions}}
        <section><h2>Why it is where it is</h2>
        <table class="grid"><thead><tr><th>Verdict</th><th>Aspect</th><th>Gate</th><th>Partition</th><th>Explanation</th><th class="n">Wait</th></tr></thead><tbody>
        {{#explain}}<tr class="{{verdict}}"><td>{{verdict}}</td><td>{{aspect}}</td><td>{{gate}}</td><td class="key">{{partition}}</td><td>{{explanation}}</td><td class="n">{{wait}}</td></tr>{{/explain}}
        </tbody></table></section>
        <section><h2>Partition per gate</h2>
        <table class="grid"><thead><tr><th>Gate</th><th>Partition</th></tr></thead><tbody>
        {{#partitions}}<tr><td>{{gate}}</td><td class="key">{{partition}}</td></tr>{{/partitions}}
        </tbody></table></section>
        <section><h2>Timeline</h2><ol class="timeline">{{#timeline}}<li><time>{{at}}</time> {{what}}</li>{{/timeline}}</ol></section>
        <section><h2>Attempts that failed</h2>
        {{#empty(failures)}}<p class="empty">None.</p>{{/empty(failures)}}
        {{^empty(failures)}}<table class="grid"><thead><tr><th class="n">Attempt</th><th>At</th><th>Error</th></tr></thead><tbody>
        {{#failures}}<tr><td class="n">{{attempt}}</td><td>{{at}}</td><td><pre>{{error}}</pre></td></tr>{{/failures}}
        </tbody></table>{{/empty(failures)}}</section>
        <section><h2>Args</h2><pre>{{args}}</pre><h2>Context</h2><pre>{{context}}</pre></section>
        {{> foot}}
        """

    static let dead = """
        {{> head}}
        <h1>Dead jobs{{#policy}} of {{policy}}{{/policy}}</h1>
        {{#empty(jobs)}}<p class="empty">No dead jobs.</p>{{/empty(jobs)}}
        {{^empty(jobs)}}<table class="grid"><thead><tr><th>Job</th><th>Policy</th><th class="n">Attempts</th><th>Died</th><th>Last error</th>{{#actions}}<th></th>{{/actions}}</tr></thead><tbody>
        {{#jobs}}<tr><td><a href="/jobs/{{id}}">{{id}}</a></td><td>{{policy}}</td><td class="n">{{attempts}}</td><td>{{at}}</td><td class="error">{{error}}</td>
        {{#actions}}<td><form method="post" action="/actions/retry"><input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="id" value="{{id}}"><button>Retry</button></form></td>{{/actions}}</tr>{{/jobs}}
        </tbody></table>{{/empty(jobs)}}
        {{#next}}<p class="pager"><a href="{{next}}">Older →</a></p>{{/next}}
        {{> foot}}
        """

    static let login = """
        {{> head}}
        <h1>Sign in to act</h1>
        <p>Viewing needs no sign-in. Actions (pause, resume, admit now, cancel, retry, drain) need the token the admin was started with (<code>--token-file</code> or <code>DISPATCH_POLICY_ADMIN_TOKEN</code>).</p>
        <form method="post" action="/login"><label>Token <input type="password" name="token" autocomplete="current-password" required></label> <button>Sign in</button></form>
        {{> foot}}
        """

    static let error = """
        {{> head}}
        <h1>{{status}}</h1>
        <p>{{message}}</p>
        {{> foot}}
        """
}

extension Templates {
    /// Partials used inside other templates.
    static let partials: [(String, String)] = [("partitionHead", partitionHead), ("partitionRow", partitionRow)]
}
