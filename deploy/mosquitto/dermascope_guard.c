/*
 * dermascope_guard: the checks Mosquitto 2.0's acl_file cannot make (docs/security.md).
 *
 * Mosquitto 2.0.11's acl_file grants every SUBSCRIBE (security_default.c: "FIXME - implement
 * ACL subscription strings") and checks read access only when a message is delivered. A
 * device subscribed to the gateways' shared subscription "$share/gateways/..." is then handed
 * its share of the uploads, which the read check drops: the gateway never sees them. The
 * acl_file also ignores the retain flag and lets a certificate CN containing '/' widen its
 * %u patterns. This plugin runs before the acl_file and refuses, for every client:
 *
 *   - any access at all by a device whose CN is not a plain device id (letters, digits, '-',
 *     '_'; at most 64; starting with a letter or digit), so "derm-B/up" cannot reach into
 *     derm/v1/derm-B/...;
 *   - a device's SUBSCRIBE outside its own subtree "<prefix>/<CN>/...", so no device joins a
 *     shared subscription or subscribes to anyone else's topics;
 *   - a retained PUBLISH anywhere but the client's own "<prefix>/<CN>/status" (a trusted
 *     client may only clear a retained message, with an empty payload);
 *   - anything by a client whose certificate is on the CRL (plugin_opt_crlfile, re-read at
 *     every reload), which it then disconnects. Mosquitto checks the CRL only at the TLS
 *     handshake: without this, a revoked device connected during the reload stayed on.
 *
 * Everything else is deferred to the acl_file, which stays the one readable policy.
 * Options (read at start): plugin_opt_topic_prefix (default "derm/v1"), plugin_opt_trusted
 * (names that are not devices, e.g. "gateway commander"; separated by spaces or commas) and
 * plugin_opt_crlfile (the listener's crlfile).
 *
 * Build: cc -shared -fPIC -O2 -Wall -Wextra -o dermascope_guard.so dermascope_guard.c -lcrypto
 * (Debian/Ubuntu: apt-get install gcc mosquitto-dev libmosquitto-dev libssl-dev).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#define MAX_ID 64
#define MAX_TRUSTED 32
#define MAX_NAME 128
#define MAX_PATH 4096
#define MAX_KICKS 256

static mosquitto_plugin_id_t *plugin_id;
static char topic_prefix[MAX_NAME] = "derm/v1";
static char trusted[MAX_TRUSTED][MAX_NAME];
static int trusted_count;
static char crl_path[MAX_PATH];
static X509_CRL *crl;
/* Clients found revoked during an ACL check, disconnected at the next tick: kicking a
 * client from inside the handling of its own packet is not safe. */
static char *to_kick[MAX_KICKS];
static int kick_count;

static int load_crl(void)
{
	FILE *f;
	X509_CRL *fresh;

	if(crl_path[0] == '\0') return MOSQ_ERR_SUCCESS;
	f = fopen(crl_path, "r");
	if(f == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "dermascope_guard: cannot open crlfile \"%s\"", crl_path);
		return MOSQ_ERR_INVAL;
	}
	fresh = PEM_read_X509_CRL(f, NULL, NULL, NULL);
	fclose(f);
	if(fresh == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "dermascope_guard: \"%s\" is not a PEM CRL", crl_path);
		return MOSQ_ERR_INVAL;
	}
	X509_CRL_free(crl);
	crl = fresh;
	mosquitto_log_printf(MOSQ_LOG_INFO, "dermascope_guard: CRL \"%s\" lists %d certificate(s)",
			crl_path, sk_X509_REVOKED_num(X509_CRL_get_REVOKED(crl)));
	return MOSQ_ERR_SUCCESS;
}

static bool is_revoked(struct mosquitto *client)
{
	X509 *cert;
	X509_REVOKED *entry = NULL;
	int found;

	if(crl == NULL || sk_X509_REVOKED_num(X509_CRL_get_REVOKED(crl)) <= 0) return false;
	cert = mosquitto_client_certificate(client);
	if(cert == NULL) return false;
	found = X509_CRL_get0_by_cert(crl, &entry, cert);
	X509_free(cert);
	return found == 1;
}

static void schedule_kick(const char *client_id)
{
	if(client_id == NULL) return;
	for(int i = 0; i < kick_count; i++){
		if(strcmp(to_kick[i], client_id) == 0) return;
	}
	if(kick_count < MAX_KICKS){
		to_kick[kick_count] = mosquitto_strdup(client_id);
		if(to_kick[kick_count]) kick_count++;
	}
}

static bool is_trusted(const char *user)
{
	for(int i = 0; i < trusted_count; i++){
		if(strcmp(trusted[i], user) == 0) return true;
	}
	return false;
}

static bool is_alnum(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* The device-id rule of device_agent/provision.py: a CN that is one topic level, never a
 * wildcard, a separator or a "$" name. */
static bool is_device_id(const char *user)
{
	size_t len = strlen(user);
	if(len == 0 || len > MAX_ID || !is_alnum(user[0])) return false;
	for(size_t i = 1; i < len; i++){
		if(!is_alnum(user[i]) && user[i] != '-' && user[i] != '_') return false;
	}
	return true;
}

/* topic starts with "<prefix>/<user>/" */
static bool in_own_subtree(const char *topic, const char *user)
{
	size_t plen = strlen(topic_prefix), ulen = strlen(user);
	return strncmp(topic, topic_prefix, plen) == 0 && topic[plen] == '/'
		&& strncmp(topic + plen + 1, user, ulen) == 0 && topic[plen + 1 + ulen] == '/';
}

static bool is_own_status(const char *topic, const char *user)
{
	size_t plen = strlen(topic_prefix), ulen = strlen(user);
	return in_own_subtree(topic, user) && strcmp(topic + plen + 1 + ulen + 1, "status") == 0;
}

static int deny(const char *user, const char *what, const char *topic)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "dermascope_guard: denied %s by \"%s\" on \"%s\"",
			what, user ? user : "(none)", topic);
	return MOSQ_ERR_ACL_DENIED;
}

static int acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *user = mosquitto_client_username(ed->client);
	bool trust;

	(void)event;
	(void)userdata;
	if(user == NULL) return deny(user, "access without a certificate identity", ed->topic);
	if(is_revoked(ed->client)){
		schedule_kick(mosquitto_client_id(ed->client));
		return deny(user, "access with a revoked certificate", ed->topic);
	}
	trust = is_trusted(user);
	if(!trust && !is_device_id(user)) return deny(user, "access by a CN that is not a device id", ed->topic);

	switch(ed->access){
		case MOSQ_ACL_SUBSCRIBE:
			if(!trust && !in_own_subtree(ed->topic, user)) return deny(user, "subscription", ed->topic);
			break;
		case MOSQ_ACL_WRITE:
			if(ed->retain){
				if(trust ? ed->payloadlen != 0 : !is_own_status(ed->topic, user)){
					return deny(user, "retained publish", ed->topic);
				}
			}
			break;
		default:
			break;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	for(int i = 0; i < kick_count; i++){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "dermascope_guard: disconnecting \"%s\": certificate revoked", to_kick[i]);
		mosquitto_kick_client_by_clientid(to_kick[i], false);
		mosquitto_free(to_kick[i]);
	}
	kick_count = 0;
	return MOSQ_ERR_SUCCESS;
}

/* SIGHUP: the listener re-reads its crlfile; so do we. A bad file keeps the previous CRL. */
static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	load_crl();
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int parse_options(struct mosquitto_opt *options, int option_count)
{
	trusted_count = 0;
	for(int i = 0; i < option_count; i++){
		if(strcmp(options[i].key, "topic_prefix") == 0){
			if(strlen(options[i].value) == 0 || strlen(options[i].value) >= MAX_NAME
					|| strpbrk(options[i].value, "+#")){
				mosquitto_log_printf(MOSQ_LOG_ERR, "dermascope_guard: bad topic_prefix \"%s\"", options[i].value);
				return MOSQ_ERR_INVAL;
			}
			snprintf(topic_prefix, sizeof(topic_prefix), "%s", options[i].value);
		}else if(strcmp(options[i].key, "crlfile") == 0){
			if(strlen(options[i].value) >= MAX_PATH) return MOSQ_ERR_INVAL;
			snprintf(crl_path, sizeof(crl_path), "%s", options[i].value);
		}else if(strcmp(options[i].key, "trusted") == 0){
			const char *p = options[i].value;
			while(*p){
				size_t n;
				p += strspn(p, " ,");
				n = strcspn(p, " ,");
				if(n == 0) break;
				if(n >= MAX_NAME || trusted_count == MAX_TRUSTED){
					mosquitto_log_printf(MOSQ_LOG_ERR, "dermascope_guard: too many or too long trusted names");
					return MOSQ_ERR_INVAL;
				}
				snprintf(trusted[trusted_count++], MAX_NAME, "%.*s", (int)n, p);
				p += n;
			}
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "dermascope_guard: unknown option \"%s\"", options[i].key);
			return MOSQ_ERR_INVAL;
		}
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	int rc;

	(void)userdata;
	plugin_id = identifier;
	rc = parse_options(options, option_count);
	if(rc) return rc;
	rc = load_crl();
	if(rc) return rc;
	mosquitto_log_printf(MOSQ_LOG_INFO, "dermascope_guard: topic prefix \"%s\", %d trusted name(s)",
			topic_prefix, trusted_count);
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL, NULL);
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL);
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL);
	return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	X509_CRL_free(crl);
	crl = NULL;
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
}
