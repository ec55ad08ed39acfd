// Registry flags shared by the commands that reach a registry, with skopeo's names:
// --src-/--dest-/--shared- prefixed for copy, unprefixed for inspect.
import { type Command, InvalidArgumentError, Option } from 'commander'
import type { RegistryOptions } from '../types.js'

/** The parsed registry flags of one side (or of `inspect`). */
export interface RegistryFlags {
  tlsVerify?: boolean
  creds?: string
  authfile?: string
  certDir?: string
  noCreds?: boolean
  registryToken?: string
}

function booleanArg(value: string | undefined): boolean {
  if (value === undefined || value === 'true') return true
  if (value === 'false') return false
  throw new InvalidArgumentError('expected true or false')
}

function credsArg(value: string): string {
  if (!value.includes(':') || value.startsWith(':')) throw new InvalidArgumentError('expected USER:PASSWORD')
  return value
}

/** The attribute name commander gives `--{prefix}{name}` (`src-` + `creds` is `srcCreds`). */
function camel(prefix: string, name: string): string {
  const p = prefix.replace(/-$/, '')
  return p ? p + name[0].toUpperCase() + name.slice(1) : name
}

/**
 * Adds `--{prefix}tls-verify[=bool]`, `--{prefix}creds USER:PASS`, `--{prefix}no-creds`,
 * `--{prefix}registry-token TOKEN`, `--{prefix}authfile FILE` and `--{prefix}cert-dir DIR` to a
 * command (prefix `src-`, `dest-`, `shared-` or nothing).
 */
export function addRegistryFlags(cmd: Command, prefix: '' | 'src-' | 'dest-' | 'shared-', side: string): Command {
  return cmd
    .addOption(new Option(`--${prefix}tls-verify [bool]`, `verify TLS of the ${side} registry; false also allows plain HTTP (default true)`).argParser(booleanArg))
    .addOption(new Option(`--${prefix}creds <user:password>`, `credentials for the ${side} registry`).argParser(credsArg))
    .addOption(
      // unprefixed, commander reads `--no-creds` as the negation of `--creds` (creds: false)
      new Option(`--${prefix}no-creds`, `access the ${side} registry anonymously`).conflicts(
        prefix ? [camel(prefix, 'creds'), camel(prefix, 'registryToken')] : ['registryToken'],
      ),
    )
    .addOption(new Option(`--${prefix}registry-token <token>`, `bearer token for the ${side} registry`).conflicts(camel(prefix, 'creds')))
    .addOption(new Option(`--${prefix}authfile <file>`, `auth file for the ${side} registry (default: REGISTRY_AUTH_FILE, containers and docker config)`))
    .addOption(
      new Option(
        `--${prefix}cert-dir <dir>`,
        `TLS files of the ${side} registry: *.crt authorities, NAME.cert + NAME.key client certificate (default: certs.d/HOST[:PORT] under ~/.config/containers, /etc/containers, /etc/docker)`,
      ),
    )
}

/** The registry options of one side, from the flags commander parsed (camel-cased by prefix). */
export function registryOptions(flags: Record<string, unknown>, prefix: '' | 'src' | 'dest' | 'shared', authfile?: string): RegistryOptions | undefined {
  const key = (name: string) => camel(prefix, name)
  const out: RegistryOptions = {}
  const tls = flags[key('tlsVerify')]
  if (typeof tls === 'boolean') out.tlsVerify = tls
  const creds = flags[key('creds')]
  if (typeof creds === 'string') {
    const at = creds.indexOf(':')
    out.credentials = { username: creds.slice(0, at), password: creds.slice(at + 1) }
  }
  const file = flags[key('authfile')] ?? authfile
  if (typeof file === 'string') out.authFile = file
  const certDir = flags[key('certDir')]
  if (typeof certDir === 'string') out.certDir = certDir
  if (flags[key('noCreds')] === true || flags[key('creds')] === false) out.anonymous = true
  const token = flags[key('registryToken')]
  if (typeof token === 'string') out.registryToken = token
  // one for the whole command, as skopeo's global flag
  if (typeof flags.registriesConf === 'string') out.registriesConf = flags.registriesConf
  return Object.keys(out).length > 0 ? out : undefined
}

/** `--registries-conf FILE`, skopeo's: the registries.conf to read instead of the usual ones. */
export const REGISTRIES_CONF_FLAGS = ['--registries-conf <file>', 'registries.conf to read alone (mirrors, remapped and blocked namespaces; default: CONTAINERS_REGISTRIES_CONF or the usual places)'] as const
