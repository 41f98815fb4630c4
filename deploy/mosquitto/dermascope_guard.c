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
 *     client may only clear a retained message, with an empty payload).
 *
 * Everything else is deferred to the acl_file, which stays the one readable policy.
 * Options: plugin_opt_topic_prefix (default "derm/v1") and plugin_opt_trusted (names that are
 * not devices, e.g. "gateway commander"; separated by spaces or commas).
 *
 * Build: cc -shared -fPIC -O2 -Wall -Wextra -o dermascope_guard.so dermascope_guard.c
 * (Debian/Ubuntu: apt-get install gcc mosquitto-dev libmosquitto-dev).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_ID 64
#define MAX_TRUSTED 32
#define MAX_NAME 128

static mosquitto_plugin_id_t *plugin_id;
static char topic_prefix[MAX_NAME] = "derm/v1";
static char trusted[MAX_TRUSTED][MAX_NAME];
static int trusted_count;

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
	mosquitto_log_printf(MOSQ_LOG_INFO, "dermascope_guard: topic prefix \"%s\", %d trusted name(s)",
			topic_prefix, trusted_count);
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
}
